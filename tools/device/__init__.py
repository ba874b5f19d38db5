"""The device bundle (wheels the GPU machine lacks, in parts that fit one call) and the runner that installs and measures there."""
