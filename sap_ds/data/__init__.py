"""Training data: sources -> conversations -> label-masked tokens, prepared once and cached.

    sources   where rows come from (local files, save_to_disk folders, Parquet, hub names)
    formats   what each ``format`` reads from a row (conversations, safety pairs)
    tables    one source -> a formatted, windowed Arrow table
    tokenize  chat template and assistant-only labels, the length limit
    mixing    the held-out split and the harmful mix, by index
    packing   several examples per sequence (the model's forward on them: sap_ds/model/packed_forward.py)
    batching  padded/packed batches and the example order of every step
    cache     fingerprint, one writer per node, atomic folders
    pipeline  preparing a run's data (datasets.map, batched, num_proc)
    run       RunData: the prepared data, memory-mapped, as the trainer reads it

How masking, mixing, packing, caching and truncation work: docs/data.md; ``sap-ds data``
(sap_ds/data_cli.py) prints what they made of a run's data. Every error
names the file, and where it can the row and the column, and says what would be valid: a
bad row found after an hour on a cluster is an hour lost.
"""
from sap_ds.data.batching import collate, collate_pairs, epoch_order, global_batch_indices
from sap_ds.data.formats import (
                                 HARMFUL_COLUMNS,
                                 PROMPT_COLUMNS,
                                 REFUSALS,
                                 RESPONSE_COLUMNS,
                                 SAFE_COLUMNS,
                                 SST2_INSTRUCTION,
                                 SST2_LABELS,
                                 Conversation,
                                 Example,
                                 SafetyPair,
                                 refusal_for,
)
from sap_ds.data.mixing import mix_harmful
from sap_ds.data.packing import (
                                 Packed,
                                 collate_packed,
                                 is_packed,
                                 pack,
                                 sequence_lengths,
)
from sap_ds.data.run import PackedSet, PairSet, RunData, TokenizedSet, build_run_data
from sap_ds.data.sources import read_rows, read_table
from sap_ds.data.tables import load_examples, load_safety_pairs
from sap_ds.data.tokenize import IGNORE_INDEX, ChatTokenizer, EncodedPair, Status, Tokenized, encode_all, encode_pairs
from sap_ds.errors import DataError

__all__ = [
    "HARMFUL_COLUMNS", "IGNORE_INDEX", "PROMPT_COLUMNS", "REFUSALS", "RESPONSE_COLUMNS", "SAFE_COLUMNS", "SST2_INSTRUCTION",
    "SST2_LABELS", "ChatTokenizer", "Conversation", "DataError", "EncodedPair", "Example", "Packed", "PackedSet", "PairSet",
    "RunData", "SafetyPair", "Status", "Tokenized", "TokenizedSet", "build_run_data", "collate", "collate_packed",
    "collate_pairs", "encode_all", "encode_pairs", "epoch_order", "global_batch_indices", "is_packed", "load_examples",
    "load_safety_pairs", "mix_harmful", "pack", "read_rows", "read_table",
    "refusal_for", "sequence_lengths",
]
