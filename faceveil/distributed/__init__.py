"""Engines that run a protection job beyond this process: Ray (ray_engine.py; the optional extra faceveil[ray]) and
the scale benchmark that compares it with the local engine (scale.py). They sit above the public API: each Ray
actor builds one faceveil.Protector and protects its share of the inputs with it. No scheduling is written here:
Ray Data hands batches of input paths to a pool of stateful actors and retries the batches of an actor that dies."""
