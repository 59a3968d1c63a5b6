"""Benchmarks of suzak's real code paths (bench/README.md); each script runs from the checkout's root as a module:

    python -m bench.grpo_step --arch tiny --prompts 2 --G 2 --completion 8 --steps 1
"""
