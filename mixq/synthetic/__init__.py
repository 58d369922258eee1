"""Checkpoints made up for tests and benchmarks: `hf_checkpoint` random Hugging Face Mixtral directories,
`exl2_checkpoint` full-size EXL2 models at real shapes (random codes), `exl2_layer` one random EXL2 layer."""
