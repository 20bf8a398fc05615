"""Where rewards come from besides an RM that shares the actor's tokenizer: an RM scored on text
with its own tokenizer (``text_rm``), and a reward server over HTTP (``http``: the protocol and
the client; ``server``: ``rlhfkit serve-rm``). The rollout's reward sources
(``rlhfkit.rollout.rewards``) wrap them."""
