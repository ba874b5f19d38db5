"""`python -m gateway` starts the public gateway."""
from .service import main

main()
