"""Self-contained Hugging Face modelling code for exported EVE encoders (copied into each HF export).

`modeling_eve.py` imports only torch and transformers — no DeepSpeed, timm or eve_ds — so that
``AutoModel.from_pretrained(dir, trust_remote_code=True)`` works for users who have none of them.
"""
