"""The teacher stage: sparse top-k teacher logits, their encodings, and the sharded store.

- `famex.teacher.codec`: chunk encodings (``paper``, ``compact``), pure numpy <-> bytes.
- `famex.teacher.store`: shard files, manifest, writer, the `LogitStore` reader and `verify`.
- `famex.teacher.generate`: the ``famex logits`` stage (teacher forward -> store).

Nothing is imported here, so ``import famex.teacher.store`` stays light for the trainer.
"""
