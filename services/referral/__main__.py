from services.referral.app import service

service.main()
