"""The web UI on port 7860 (Gradio), a client of the gateway through the SDK; it never imports the gateway."""
