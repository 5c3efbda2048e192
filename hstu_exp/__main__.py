"""`python -m hstu_exp` and the `hstu-exp` command. Ctrl-C while the libraries load (torch and
Hydra take seconds) ends in one line; cli.main installs the handlers of a run once it starts."""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    print("hstu-exp: interrupted while starting; nothing was run", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def run() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted_while_starting)
    from hstu_exp.cli import main

    main()


if __name__ == "__main__":
    run()
