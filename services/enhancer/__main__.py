"""`python -m services.enhancer` starts the enhancer service."""
from .service import main

main()
