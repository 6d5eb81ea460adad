"""The nn.Module building blocks the words of a spec stand for (gates, experts, layers)
and the MoE data-movement functions the compiled graph calls."""
