"""EVLM on packed webdataset rows (`eve-make-shards --format interleaved|caption|vqa|grounding|sft|video`)."""
