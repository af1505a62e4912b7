"""One logger for the project; every line carries the rank so interleaved logs stay readable."""

import logging
import os

logger = logging.getLogger("torchtitan")


def init_logger(level: int = logging.INFO) -> None:
    rank = os.environ.get("RANK", "0")
    logger.handlers.clear()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
