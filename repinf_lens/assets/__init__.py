"""Assets shipped inside the package: LoRA finetunes of the embedded default model (``finetunes/<name>``: the
adapter in fp16 safetensors, its peft config and ``provenance.json``). Load them with
``repinf_lens.load_model("<name>")`` (see ``repinf_lens.models.SHIPPED_FINETUNES``)."""
