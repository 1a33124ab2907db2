"""Latency/throughput sweeps and the one-rank slice of an 8-GPU deployment: the same as `mavjax bench`
(mavjax/bench.py documents the metrics).

  python scripts/benchmark.py --random-weights --preset maverick --layers 2 --batch-sizes 1 8 --input-len 128
  python scripts/benchmark.py --random-weights --preset maverick --quantize fp8 --rank-slice 8
"""

import sys

from mavjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
