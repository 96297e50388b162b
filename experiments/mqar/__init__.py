"""MQAR: the multi-query associative-recall task (`task.py`) and the model x size x lr sweep (`sweep.py`)."""
