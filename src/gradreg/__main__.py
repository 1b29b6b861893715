from .cli import entry

if __name__ == "__main__":  # a spawned worker process (gradreg.runner) imports this module without running it
    entry()
