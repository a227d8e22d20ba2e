"""A stand-in for the sipp binary as the worker runs it: a 3PCC controller B
that listens on its twin socket (``-3pcc``) and answers each fake call with
an outcome, as the bundled scenario does; for the runner's own behaviour
(time limits, crashes, arguments, shutdown) in tests that need no SIP.

    fake_sipp.py [--delay S] [--outcome NAME | --silent] [--die-after N]
                 [--exit CODE --say TEXT] [--record FILE] [--bind] -- <sipp arguments>
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

ESC = b"\x1b"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--outcome", default="completed")
    parser.add_argument("--silent", action="store_true")
    parser.add_argument("--die-after", type=int, default=0)
    parser.add_argument("--exit", type=int, default=None)
    parser.add_argument("--say", default="")
    parser.add_argument("--record", default="")
    parser.add_argument("--bind", action="store_true", help="bind -i/-p (UDP) as SIPp does; exit 255 if taken")
    ours, _, theirs = " ".join(sys.argv[1:]).partition(" -- ")
    args = parser.parse_args(ours.split())
    sipp = theirs.split()
    if args.record:
        with open(args.record, "a") as f:
            f.write(f"start pid={os.getpid()} args={' '.join(sipp)}\n")
    if args.exit is not None:
        print(args.say, file=sys.stderr)
        sys.exit(args.exit)
    if args.bind and "-p" in sipp:
        sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sip.bind((sipp[sipp.index("-i") + 1], int(sipp[sipp.index("-p") + 1])))
        except OSError as exc:
            print(f"Unable to bind main socket, errno = {exc.errno} ({exc.strerror})", file=sys.stderr)
            sys.exit(255)
    host, port = sipp[sipp.index("-3pcc") + 1].rsplit(":", 1)
    server = socket.create_server((host, int(port)))
    conn, _ = server.accept()
    lock = threading.Lock()
    buffer = b""
    seen = 0
    while True:
        data = conn.recv(65536)
        if not data:
            return  # the worker closed the twin socket: SIPp exits
        buffer += data
        while ESC in buffer:
            message, buffer = buffer.split(ESC, 1)
            text = message.decode()
            if args.record:
                with open(args.record, "a") as f:
                    f.write(f"pid={os.getpid()} " + text.replace("\r\n", " | ") + "\n")
            seen += 1
            if args.die_after and seen >= args.die_after:
                os._exit(1)
            if "internal-cmd" in text or args.silent:
                continue
            headers = dict(line.split(": ", 1) for line in text.split("\r\n") if ": " in line)
            job = headers["X-Evw-Call"].split(" ")[0]
            reply = f"Call-ID: {headers['Call-ID']}\r\nX-Evw-Job: {job}\r\nX-Evw-Outcome: {args.outcome}\r\n\r\n"

            def answer(reply: bytes = reply.encode()) -> None:
                time.sleep(args.delay)
                with lock:
                    conn.sendall(reply + ESC)

            threading.Thread(target=answer, daemon=True).start()


if __name__ == "__main__":
    main()
