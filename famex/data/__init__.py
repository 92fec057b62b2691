"""Data: reading text, tokenizing it into shards (`famex data`), and packing chunks for training.

- `sources`: documents from JSONL / Parquet / .txt / saved datasets, in a fixed order.
- `demo`: the offline demo corpus.
- `prepare`: the `famex data` stage (parallel tokenization, train/val split, resumable shards).
- `packing`: fixed-length chunks of concatenated documents with per-document positions, labels
  and attention masks, as the trainer and the teacher see them.
"""
