"""Prompt sets, the k-repeat group sampler and the toy worlds that the RL loop can run on."""
