"""One module per pipeline stage; each ``run(context)`` validates its inputs, works, writes atomically."""
