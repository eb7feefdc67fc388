"""What a user runs on converted models: verify, bench, generate, the demo."""
