"""Publishing finished models: Hub upload (hub.py) and the model card (model_card.py)."""
