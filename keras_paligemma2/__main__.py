import sys

from keras_paligemma2.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
