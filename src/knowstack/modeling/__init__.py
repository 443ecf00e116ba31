"""Models on disk and in memory, below everything that loads, trains or combines them: safetensors read
tensor by tensor and written shard by shard (streaming.py), knowstack's own MoE model class (moe_model.py),
the LoRA-MoE modules and their loader (lora_moe.py), and an MoE's router weights and decoder layers
(routing.py). modelio, train and combine all build on these; they import nothing above errors and atomic."""
