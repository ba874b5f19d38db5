"""`python -m services.detector` starts the detector service."""
from .service import main

main()
