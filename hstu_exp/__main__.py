from hstu_exp.cli import main

main()
