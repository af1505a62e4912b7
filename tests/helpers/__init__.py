"""What the tests share: tiny training runs (runs.py), the scripts tests launch (train_runner.py,
document_mask_worker.py, full_disk.py) and small builders. No test imports another test file."""
