"""evapi-worker: gives late-registering push devices the call they missed.

A sidecar to Kamailio: it reads call and REGISTER events from the evapi
socket, decides when an iOS (CallKit) device registered too late for tsilo
to deliver the call, and sends that device an INVITE with the original
Call-ID followed by a CANCEL whose Reason says how the call ended.
"""

__version__ = "0.1.0"
