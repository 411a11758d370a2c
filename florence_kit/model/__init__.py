"""Stage 3, model: native Florence-2 loaded, configured for a training mode, and sized.

``loading.load_model`` is the one entry; ``checkpoint_io`` (native folders), ``adapters`` (LoRA/QLoRA),
``modes``, ``precision``, ``activation_checkpointing``, ``compiling``, ``memory`` (the planner), ``tiny``,
``onnx_runtime`` (an exported folder run in onnxruntime, a drop-in for the PyTorch model).
"""
