"""Plain-torch building blocks below both the STTS algorithm and the model: attention kernels
over packed variable-length sequences, g x g patch grouping, attention pooling."""
