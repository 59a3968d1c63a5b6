"""suzak: SFT + GRPO for Qwen2.5-VL visual reasoning (R1-V style), with a vLLM rollout server.

    suzak --help
"""

__version__ = "0.1.0"
