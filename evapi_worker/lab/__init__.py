"""The lab: what the demo, the tests and the benchmarks run beside the
worker on loopback: a supervised Kamailio and redis-server, SIPp phones,
stand-ins for APNs and FCM. The worker itself never imports it (only its
``demo`` and ``push standin`` commands do).
"""
