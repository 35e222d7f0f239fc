"""Command-line fronts (click): dera-chat, dera-eval, dera-convert."""
