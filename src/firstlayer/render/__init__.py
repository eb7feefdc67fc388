"""Rendering: the text every command prints (`text`, torch-free) and plots (`plot`, matplotlib
loaded only when a picture is asked for)."""
