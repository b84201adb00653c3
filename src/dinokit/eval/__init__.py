"""dinokit.eval"""
