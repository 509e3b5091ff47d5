"""QLoRA fine-tuning jobs: LoRA adapters trained on a frozen 4-bit (bitsandbytes) base (`pipeline.finetune`)."""
