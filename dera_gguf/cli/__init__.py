"""Command-line fronts (click), one module a command of pyproject.toml's [project.scripts]:

- dera-chat (chat.py, chat_session.py): an interactive realigned chat, λ changed live, or a one-shot answer;
- dera-eval (eval.py): λ sweeps on validation data, ``score`` (eq. 14) and ``generate`` (rewards, KL);
- dera-convert (convert.py): Hugging Face checkpoints, or a whole pair, to GGUF in a chosen quant type;
- dera-serve (serve.py): an OpenAI-compatible server with λ per request;
- dera-pull (pull.py): downloads a named pair (and its drafter) and checks it;
- dera-pairs (pairs.py): lists the pairs of models.toml, pulled or not, and the user model folder.

Options two commands share are defined once in common.py.
"""
