"""Batch generation over a JSONL file: the same as `mavjax batch` (mavjax/batch.py documents the formats).

  python scripts/batch_generate.py --input prompts.jsonl --output results.jsonl [--resume] [--batch-size 32]
"""

import sys

from mavjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
