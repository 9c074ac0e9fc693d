"""`python tests/_slow_serve.py PACKAGE PORT SHUTDOWN_TIMEOUT_S`: the server as `portable-infer serve`
runs it (runner.serve, signals and all), over an engine slowed to 50 ms a step, so that requests are
still running when a test sends SIGTERM (tests/test_server_shutdown.py)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEP_DELAY_S = 0.05


def main() -> None:
    import portable_infer
    from _serving import SlowEngine, with_engine
    from portable_infer.serving.scheduler import Scheduler, SchedulerConfig
    from portable_infer.serving.http import ServerConfig, serve

    package, port, shutdown_timeout_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    model = portable_infer.load(package, "cpu", intra_op_threads=1)
    slow = with_engine(model, SlowEngine(model.engine, STEP_DELAY_S))
    serve(Scheduler(slow, SchedulerConfig(max_batch=4, prefill_chunk=16)),
          ServerConfig(port=port, shutdown_timeout_s=shutdown_timeout_s))


if __name__ == "__main__":
    main()
