"""`python -m worker`: run one instance of a Python service under the supervisor."""

from worker.main import main

if __name__ == "__main__":
    main()
