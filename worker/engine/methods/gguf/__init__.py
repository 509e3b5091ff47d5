"""GGUF for llama.cpp, Ollama and LM Studio (`quant_method: "gguf"`).

One job reads the Hugging Face checkpoint once, tensor by tensor, and writes `model-<TYPE>.gguf` for every
requested llama.cpp type as it goes (`format.GGUFOutput`): the conversion (`convert`: llama.cpp's tensor
names and layout, hyper-parameters, RoPE; `vocab`: the tokenizer) is shared, and each type's tensors get the
ggml types llama-quantize would give them (`recipes`), quantized by `qaas.kernels.gguf` byte-exact with ggml.
Evaluation measures each file's perplexity through llama.cpp's own logits.
"""

from .method import GGUFMethod

__all__ = ["GGUFMethod"]
