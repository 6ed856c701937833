from edgexfer.entry import main

main()
