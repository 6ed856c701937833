from edgexfer.runtime.cli import main

main()
