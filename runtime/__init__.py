"""The runtime: process groups from the torchrun environment, execution of a compiled graph
on one rank, CUDA-graph capture, the training and inference loops, data, checkpoints, metrics."""
