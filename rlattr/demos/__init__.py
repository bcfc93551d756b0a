"""``rlattr demo`` (PPO on CartPole with InfluenceCallback) and ``rlattr demo-digits``."""
