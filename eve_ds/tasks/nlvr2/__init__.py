"""NLVR2: the official files (`data`), accuracy and the prediction file (`eval`), the task (`task`) and a
synthetic set in the official layout (`synthetic`)."""
