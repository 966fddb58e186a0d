"""Batch embedding, the producer's side: a corpus cut into chunks by a token budget and sent to a
model's queue in the batch lane (`chunks`; `tokens` counts with the model's own tokenizer where
its files are here), a resumable run that writes the vectors out (`run`), and the file formats
it reads and writes (`files`). The worker's side, merging concurrent jobs into one forward
pass, is `dynamic_batching.py`."""
