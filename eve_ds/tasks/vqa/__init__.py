"""VQA v2: the official files (`data`), the official accuracy (`eval`), the task (`task`) and a synthetic set
in the official layout (`synthetic`)."""
