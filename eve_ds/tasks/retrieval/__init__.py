"""Image-text retrieval (COCO / Flickr30K, Karpathy splits): the files (`data`), recall@K and re-ranking
(`eval`), the task (`task`) and synthetic sets in the Karpathy layout (`synthetic`)."""
