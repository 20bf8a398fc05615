"""The RL core that PPO and the critic-free family share: the critic modes (``critics``), the
advantage step and the update (``update``), and the metric names (``metrics``). Experience
collection lives in ``rlhfkit.rollout.collect``; the math in ``rlhfkit.algos``."""
