"""The three model services: detector, lipsync, enhancer."""
