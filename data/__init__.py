"""ECInstruct data pipeline: load rows, render eCeLLM's prompts, tokenize with masking and truncation, plan batches.

    rows = load_rows("NingLab/ECInstruct" or a .json/.jsonl/.parquet path, split="train", tasks="all",
                     settings=("IND_Diverse_Instruction",))
    data = tokenize_rows(rows, tokenizer, cutoff=2048, cache_dir=".cache/data")
    for step in plan_epoch(data.lengths, epoch=0, seed=0, seqs_per_step=128, max_tokens=16384):
        for micro in step:   # the rows end to end, no padding: input_ids, labels (1, N) and the rows' lengths
            batch = pack([data.input_ids[i] for i in micro], [data.labels[i] for i in micro])

`python -m data.inspect --dataset FILE --tasks all --setting S --tokenizer MODEL` prints what a
selection holds. DEFAULT_SAMPLE is the small in-repo sample (CC-BY-4.0, see data/sample/README.md).
"""

from pathlib import Path

from .batching import collate, pack, plan_epoch, plan_stats
from .ecinstruct import (DEFAULT_SETTING, FIELDS, SETTINGS, SPLITS, DataError, describe_counts, load_rows,
                         parse_settings, parse_split, parse_tasks, read_rows, select_rows)
from .encode import IGNORE_INDEX, TokenizedData, encode_example, encode_prompt, tokenize_rows
from .prompts import RESPONSE_SPLIT, render_prompt

DEFAULT_SAMPLE: Path = Path(__file__).resolve().parent / "sample" / "ecinstruct_sample.jsonl"

__all__ = [
    "DEFAULT_SAMPLE", "DEFAULT_SETTING", "FIELDS", "IGNORE_INDEX", "RESPONSE_SPLIT", "SETTINGS", "SPLITS",
    "DataError", "TokenizedData", "collate", "describe_counts", "encode_example", "encode_prompt", "load_rows", "pack",
    "parse_settings", "plan_stats", "parse_split", "parse_tasks", "plan_epoch", "read_rows", "render_prompt",
    "select_rows", "tokenize_rows",
]
